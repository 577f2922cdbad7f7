"""Backbone loading, control encoder, Lightning module and sampling."""
