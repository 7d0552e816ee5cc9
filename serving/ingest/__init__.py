"""What gets indexed, read from datasets, folders, buckets, GeoTIFF scenes and STAC catalogs, and the index build."""
