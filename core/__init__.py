"""winnow.core: the ground floor every room may import (store, shards, params, errors, lock, models, layout)."""
