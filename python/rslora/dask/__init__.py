"""rslora on Dask: the command line's ``--workers`` / ``--scheduler`` (:mod:`.cluster`).

Needs the ``dask`` extra (``pip install "rslora[dask]"``); ``import rslora`` never imports Dask.
"""
