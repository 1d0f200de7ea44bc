"""Building blocks of the served models: rotary embeddings and paged attention."""
