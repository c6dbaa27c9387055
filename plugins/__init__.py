"""The plugins shipped with nbtunnel (installed by pip as the package ``nbtunnel_plugins``).

nbtunnel loads each file here by its path (see ``nbtunnel.plugin_files``); nothing
imports this package.
"""
