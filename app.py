"""Start the FetalStudio web app: python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass]."""

from __future__ import annotations

import argparse
import os
import sys

from fetalstudio.errors import FetalStudioError
from fetalstudio.ui.server import ServerOptions, check_server_options, parse_auth


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    parser = argparse.ArgumentParser(description="FetalStudio web app (opens in your browser).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback needs --auth")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--auth", help="USER:PASSWORD required to open the app")
    parser.add_argument("--share", action="store_true", help="create a public Gradio share link (needs --auth)")
    args = parser.parse_args(argv)
    return check_server_options(ServerOptions(args.host, args.port, parse_auth(args.auth), args.share))


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

    from fetalstudio.app_context import build_context
    from fetalstudio.ui.shell import CSS, JS, THEME, build_ui

    context = build_context()
    context.outputs_dir.mkdir(parents=True, exist_ok=True)
    build_ui(context).queue(default_concurrency_limit=4).launch(
        server_name=options.host,
        server_port=options.port,
        auth=options.auth,
        share=options.share,
        allowed_paths=[str(context.outputs_dir)],
        theme=THEME,
        css=CSS,
        js=JS,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        footer_links=[],
        enable_monitoring=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
