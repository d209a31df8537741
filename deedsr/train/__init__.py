"""Training: the tiny preset's autoencoder, stage I (contrastive degradation learner) and
stage II (adapter, modulation, cross-attention), on one process or many under torchrun.

Entry points: `deedsr train ...` / `python -m deedsr.train ...` (deedsr.train.cli), and the
stage classes (deedsr.train.stage1.Stage1, .stage2.Stage2, .vae.VaeStage) with
deedsr.train.trainer.run. Importing this package imports neither torch nor diffusers.
"""
