"""The SFT stack: the commands on top of the plugin (train, evaluate, analyze), a room per job.

The plugin (the rest of `q_tuning`) never imports it; it only calls the plugin's public API.
"""
