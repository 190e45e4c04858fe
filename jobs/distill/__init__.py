"""Distillation (`algorithm: distill`): the divergences, the layer-dropped student, the teacher cache."""
