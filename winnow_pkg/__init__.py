"""winnow: curate fine-tuning data sample by sample and token by token, and train on what it keeps.

The subpackages live in top-level folders of the repository (``pipeline/``, ``stages/``,
``trainer/``, ``kernels/``) mapped under this package by setuptools, so generic names such as
``kernels`` never collide in site-packages.
"""

__version__ = "0.1.0"
