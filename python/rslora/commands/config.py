"""``rslora config``: which BLAS and backends this installation uses."""


def register(sub) -> None:
    p = sub.add_parser("config", help="show the BLAS library and backends rslora uses")
    p.set_defaults(func=run)


def run(args) -> int:
    import rslora

    rslora.show_config()
    return 0
