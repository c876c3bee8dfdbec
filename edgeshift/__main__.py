"""``python -m edgeshift``: the same CLI as the ``edgeshift`` script."""

from edgeshift.cli import main

main()
