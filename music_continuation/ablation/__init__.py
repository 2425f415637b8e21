"""Loss ablations: the grid and its cells, the local and Slurm executors, the comparison report."""
