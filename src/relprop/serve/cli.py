"""``relprop serve``: the interactive explorer in the browser, on the bundled models by default."""
from __future__ import annotations

import ipaddress
import sys

LOOPBACK_NAMES = ("localhost",)


def register(subparsers) -> None:
    from .models import BUNDLED

    parser = subparsers.add_parser("serve", help="explore explanations interactively in the browser (local web app)")
    parser.add_argument("--model", action="append", metavar="DIR_OR_NAME",
                        help=f"a model to offer (repeatable): a bundled one ({', '.join(BUNDLED)}) or a local "
                             "folder of an image classifier, text classifier or causal LM (default: the bundled ones)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; another one exposes the "
                             "models to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.set_defaults(run=run)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    from ..errors import UsageError

    try:
        import uvicorn
        from .app import create_app
    except ImportError as error:
        raise UsageError(f"relprop serve needs the serve extra ({error.name} is missing): "
                         "pip install 'relprop[serve]'") from None
    from .models import BUNDLED, ModelSet

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    names = args.model or list(BUNDLED)
    print(f"loading {', '.join(names)} ...", file=sys.stderr)
    models = ModelSet.load(names)
    models.warm_up()
    print("serving " + ", ".join(f"{m.name} ({m.kind})" for m in models.models.values()), file=sys.stderr)
    local = is_loopback(args.host)
    if not local:
        print(f"warning: listening on {args.host}: anyone who can reach this address can use the served models "
              "and this machine's CPU; there is no login", file=sys.stderr)
    allowed = ["127.0.0.1", "localhost", "::1", "[::1]"] if local else None
    app = create_app(models, allowed_hosts=allowed)
    try:
        sock = bind(args.host, args.port)
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"relprop explorer on http://{shown}:{port}/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def bind(host: str, port: int):
    """A listening socket (port 0: a free one), so the printed address is the real one."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
