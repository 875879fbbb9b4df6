"""The model families the worker serves, written for serving: fused projections, attention over
the paged KV pool, and only one pipeline stage's weights in memory."""
