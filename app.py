"""Start the FetalStudio web app: python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass] ... (see --help)."""

from __future__ import annotations

import argparse
import os
import sys
import webbrowser
from pathlib import Path

from fetalstudio.errors import FetalStudioError
from fetalstudio.ui.server import (DEFAULT_MAX_FILE_SIZE_MB, ServerOptions, check_server_options, parse_auth,
                                   readable_data_dirs, running_line, should_open_browser)

#: The image readers' pixel limit (declared size, checked before decoding); --max-pixels sets it.
MAX_PIXELS_ENV = "FETALSTUDIO_MAX_PIXELS"


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    parser = argparse.ArgumentParser(description="FetalStudio web app (opens in your browser).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback needs --auth")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--auth", help="USER:PASSWORD required to open the app")
    parser.add_argument("--share", action="store_true", help="create a public Gradio share link (needs --auth)")
    parser.add_argument("--data-dir", action="append", type=Path, default=[], metavar="FOLDER",
                        help="a server folder the batch and import boxes may read when the app listens beyond this "
                             "computer (repeatable; on 127.0.0.1 any folder can be read)")
    parser.add_argument("--max-file-size", type=float, default=DEFAULT_MAX_FILE_SIZE_MB, metavar="MB",
                        help=f"largest upload in megabytes (default {DEFAULT_MAX_FILE_SIZE_MB})")
    parser.add_argument("--max-pixels", type=int, metavar="N",
                        help="largest image (width x height x frames) the readers decode; larger ones are refused before decoding")
    parser.add_argument("--no-browser", action="store_true", help="do not open the page in a browser")
    args = parser.parse_args(argv)
    return check_server_options(ServerOptions(
        args.host, args.port, parse_auth(args.auth), args.share, data_dirs=tuple(args.data_dir),
        max_file_size_mb=args.max_file_size, max_pixels=args.max_pixels, open_browser=not args.no_browser))


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse_args(argv)
    except FetalStudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from fetalstudio.paths import outputs_dir

    # Gradio's copies of served and uploaded files stay inside the app's own folders, not in
    # /tmp/gradio; set before gradio is imported, which reads it at import time.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(outputs_dir() / ".gradio-cache"))
    if options.max_pixels is not None:
        os.environ[MAX_PIXELS_ENV] = str(options.max_pixels)

    from fetalstudio.app_context import build_context
    from fetalstudio.paths import upload_cache_dir
    from fetalstudio.ui.server import CacheBudget, CachePruner, quiet_custom_component_requests, server_middleware
    from fetalstudio.ui.shell import CSS, THEME, build_ui

    context = build_context(data_dirs=readable_data_dirs(options))
    context.outputs_dir.mkdir(parents=True, exist_ok=True)
    pruner = CachePruner(upload_cache_dir(), CacheBudget())
    pruner.start()
    quiet_custom_component_requests()
    page = build_ui(context)
    blocks = page.blocks
    blocks.queue(default_concurrency_limit=4).launch(
        server_name=options.host,
        server_port=options.port,
        auth=options.auth,
        share=options.share,
        allowed_paths=[str(context.outputs_dir)],
        max_file_size=options.max_file_size_bytes,
        app_kwargs={"middleware": server_middleware()},
        theme=THEME,
        css=CSS,
        js=page.js,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        footer_links=[],
        enable_monitoring=False,
        quiet=True,
        prevent_thread_lock=True,
    )
    print(running_line(options), flush=True)
    if blocks.share_url:
        print(f"Public link: {blocks.share_url}", flush=True)
    if should_open_browser(options):
        webbrowser.open(options.url)
    try:
        blocks.block_thread()
    finally:
        pruner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
