"""``python -m thpcow.cli``: the same as the ``thpcow`` command."""

from . import main

main()
