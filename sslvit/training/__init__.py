"""Training: pretraining (:mod:`.pretrain`) and fine-tuning (:mod:`.finetune`) on one core.

:mod:`.schedules` holds the per-step learning-rate / weight-decay rules and the batch / lr-per-256 derivation both
kinds use, :mod:`.state` the typed state the loop carries and resumes from, :mod:`.loop` one optimisation step and
the step-by-step machinery (micro-batches, logging window, bad-step guard), :mod:`.derived` what a recipe works out
to at one launch (global batch, absolute lr, step counts). Import the submodules directly; this package imports
nothing.
"""
