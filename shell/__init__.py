"""The application shell: the ``prepaid`` command (cli.py) and ``prepaid serve`` (serve.py).

The top floor: it imports the services (agi, ami_listener, policy) and the core (prepaid);
nothing imports it (docs/design.md, "Floors")."""
