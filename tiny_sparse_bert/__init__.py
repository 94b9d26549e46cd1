"""tiny-sparse-bert: a small, from-scratch reproduction of Sparse*BERT (Campos et al., 2022).

The reading path, in order: train_general.py, train_bio.py and finetune.py (the paper's three
steps), then model.py (BERT), pruning.py (gradual magnitude pruning), data.py (tokenizer, corpora,
MLM masking) and train.py (the training loop). Every other module is support code that says so
in its first lines: bookkeeping, runtime, config, evaluation, distillation, pruning_lab, tasks,
transfer, recovery, sparse, hf, cpu_dropout, plots.
"""
