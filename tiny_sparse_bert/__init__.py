"""tiny-sparse-bert: a small, from-scratch reproduction of Sparse*BERT (Campos et al., 2022)."""
