"""The Azure VMSnapshotLinux extension's drop-ins: its `PluginHost` class (pluginhost.py), its
`safefreeze` helper's protocol (safefreeze.py) and their commands (cli.py), over pyexec's core."""
