"""``rslora config``: which BLAS and backends this installation uses."""

NEEDS = ()  # optional modules, checked before any work (rslora.cli.require)


def register(sub) -> None:
    p = sub.add_parser("config", help="show the BLAS library and backends rslora uses")
    p.set_defaults(func=run)


def run(args) -> int:
    import rslora

    rslora.show_config()
    return 0
