"""The ``celeriac`` command line (click): a thin shell over the app and worker objects."""
