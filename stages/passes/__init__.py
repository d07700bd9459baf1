"""Model passes: one forward per model alias over sparse-packed batches, writing per-token signals."""
