"""Backbone, control encoder, Lightning module, sampling, checkpoints, run directories, exports, inference."""
