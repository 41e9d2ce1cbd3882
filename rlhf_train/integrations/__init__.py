"""Integrations of the training side with data-processing frameworks (Ray Data: :mod:`.ray`)."""
