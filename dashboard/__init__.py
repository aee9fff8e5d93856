"""Streamlit review dashboard reading and writing through :mod:`anomaly.store`."""
