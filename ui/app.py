"""ragserve quality-latency explorer: `ragserve ui` or `streamlit run ui/app.py [-- --server-url URL]`.

Tabs: the trade-off of saved runs (eval/results, profiles), one query with its decision
and timings, two settings compared, and the engine's load over time. Queries run on a
ragserve server (URL in the sidebar) or on the controller in this process.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # `streamlit run ui/app.py` puts ui/ on the path, not the repo
    sys.path.insert(0, str(REPO))

import streamlit as st  # noqa: E402

from ragserve.errors import RagServeError  # noqa: E402
from ui import registry  # noqa: E402
from ui.backend import BackendUnavailable, QueryBackend, is_http_url  # noqa: E402
from ui.views import compare, live, query, tradeoff  # noqa: E402

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
SERVER, IN_PROCESS = "ragserve server", "in-process controller"


def _args() -> argparse.Namespace:
    """Options after `--` on the streamlit command line (unknown ones are ignored: under
    AppTest, sys.argv is pytest's)."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--server-url")
    p.add_argument("--config")
    args, _ = p.parse_known_args(sys.argv[1:])
    return args


def _server(args: argparse.Namespace) -> tuple[QueryBackend | None, str | None]:
    url = st.sidebar.text_input("Server URL", value=args.server_url or DEFAULT_SERVER_URL, key="server_url")
    api_key = st.sidebar.text_input("API key (if queries need one)", type="password", key="server_key")
    blend_url = st.sidebar.text_input("CacheBlend server URL (optional, for Compare)", key="server_blend_url",
                                      help="A second server started with `blend: {enabled: true}`.")
    for name, value, required in (("Server URL", url, True), ("CacheBlend server URL", blend_url, False)):
        if (required or value.strip()) and not is_http_url(value.strip()):
            st.sidebar.error(f"{name}: not an http(s) URL", icon=":material/link_off:")
            return None, f"{name} {value!r} is not an http(s) URL like {DEFAULT_SERVER_URL}."
    backend = registry.http_backend(url.strip(), api_key, blend_url.strip())
    try:
        status = backend.ready()
    except BackendUnavailable as exc:
        st.sidebar.error(f"{url}: not reachable", icon=":material/cloud_off:")
        return backend, str(exc)
    if status == "ready":
        st.sidebar.success(f"{backend.url}: ready")
    elif status == "degraded":   # serving, but a collection does not load (left out of the pickers)
        st.sidebar.warning(f"{backend.url}: ready, but a collection is damaged (GET /readyz names it "
                           "and the way out)")
    else:
        st.sidebar.warning(f"{backend.url}: {status} (still loading the model?)")
    return backend, None


def _in_process(args: argparse.Namespace) -> tuple[QueryBackend | None, str | None]:
    backend = registry.get_inprocess()
    if backend is None:
        config = st.sidebar.text_input("Config file (YAML, optional)", value=args.config or "",
                                       key="inproc_config")
        if not st.sidebar.button("Start the in-process controller", key="inproc_start"):
            return None, None
        try:
            with st.spinner("Loading the model and the embedder…"):
                backend = registry.start_inprocess(config.strip() or None)
        except (RagServeError, OSError) as exc:
            return None, f"Could not start the in-process controller: {exc}"
    st.sidebar.success("in-process controller ready")
    return backend, None


def main() -> None:
    st.set_page_config(page_title="ragserve explorer", page_icon="⚖️", layout="wide")
    st.title("ragserve · quality–latency explorer")
    args = _args()
    st.sidebar.header("Queries run on")
    mode = st.sidebar.radio("Queries run on", [SERVER, IN_PROCESS], key="mode", label_visibility="collapsed")
    backend, problem = _server(args) if mode == SERVER else _in_process(args)
    tabs = st.tabs(["Trade-off", "Try a query", "Compare", "Live load"])
    with tabs[0]:
        tradeoff.render(REPO)
    with tabs[1]:
        query.render(backend, problem)
    with tabs[2]:
        compare.render(backend, problem)
    with tabs[3]:
        live.render(backend, problem)


main()
