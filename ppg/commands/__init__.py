"""The ``ppg`` commands beside ``fit``/``validate``/``test`` (see ``ppg.cli.COMMANDS``).

Commands import the library; nothing in the library imports a command.
"""
