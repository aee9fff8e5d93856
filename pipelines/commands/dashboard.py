"""``anomaly dashboard``: start the Streamlit review app on localhost as a separate process."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pipelines.commands.common import UserError, add_db_option, new_parser

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "dashboard", "Open the review dashboard (worklist, viewer, verdicts) on a database.",
                   "anomaly dashboard --db results/demo.db --port 8501")
    add_db_option(p)
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.set_defaults(func=run)


def app_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("dashboard")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "app.py"
        if candidate.is_file():
            return candidate
    if APP.is_file():
        return APP
    raise UserError("the dashboard app was not found; reinstall the package with its dashboard extra")


def _terminate_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the ``finally`` below stops the Streamlit child."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    try:
        import streamlit  # noqa: F401
    except ImportError as exc:
        raise UserError("Streamlit is not installed: pip install 'brain-anomaly[dashboard]'") from exc
    from anomaly.store import default_db_url, normalize_db_url

    url = normalize_db_url(args.db) if args.db else default_db_url()
    env = dict(os.environ, ANOMALY_DB=url)
    print(f"dashboard: http://{args.host}:{args.port}  (database {url}; Ctrl-C to stop)", flush=True)
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path()), "--server.port", str(args.port),
           "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal"]
    _terminate_on_sigterm()
    child = subprocess.Popen(cmd, env=env)
    try:
        return child.wait()
    finally:  # also on SIGTERM or an exception: never leave the server running behind us
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
