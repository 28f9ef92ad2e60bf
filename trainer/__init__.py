"""Trains, evaluates and publishes the models."""
