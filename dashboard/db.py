"""The dashboard's one store per database URL (from ``ANOMALY_DB``), opened once per server process."""

from __future__ import annotations

import os

import streamlit as st

from anomaly.store import ENV_VAR, Store, default_db_url, open_store


def database_url() -> str:
    """The URL the app works on: ``ANOMALY_DB`` (set by ``anomaly dashboard --db``) or ``./anomaly.db``."""
    return os.environ.get(ENV_VAR, "").strip() or default_db_url()


@st.cache_resource(show_spinner="Opening the database…")
def _store(url: str) -> Store:
    return open_store(url)


def get_store() -> Store:
    """The store of :func:`database_url`, created and migrated on first use."""
    return _store(database_url())
