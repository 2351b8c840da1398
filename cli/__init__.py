"""The ``crat-ft`` command line (installed as ``crat_ft.cli``)."""
