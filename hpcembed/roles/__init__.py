"""The three roles of a job, each a loop over a Transport: conductor (rank 0), tokenizer, gpu."""
