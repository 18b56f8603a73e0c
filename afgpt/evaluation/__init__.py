"""Evaluation of afgpt models: BLiMP (`afgpt.evaluation.blimp`) and SuperGLUE (`afgpt.evaluation.superglue`)."""
