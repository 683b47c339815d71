"""Reading the corpus (sources, readers) and writing embeddings (writer)."""
