"""hpcembed: embed very large text corpora as one MPI job on HPC clusters."""
__version__ = "0.1.0"
