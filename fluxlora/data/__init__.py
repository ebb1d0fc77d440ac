"""Images, captions, buckets, datasets and content-keyed caches."""
