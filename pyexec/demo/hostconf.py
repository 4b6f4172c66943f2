"""A demo host's pyexec config, root-owned in a private directory: the host config naming one
ScriptRunner plugin whose pre- and post-scripts quiesce and resume the host's application."""
from __future__ import annotations

import os

import orjson

from pyexec.demo.output import write_file


def write_host_config(etc: str, app_name: str, pre: str, post: str, quiesce: bool = True,
                      script_timeout: int = 30) -> str:
    """Write etc/pre.sh and etc/post.sh (their shell bodies after the #! line), the plugin's JSON and
    etc/VMSnapshotPluginHost.conf (no plugin at all unless quiesce); the host config's path."""
    pre_sh = write_file(os.path.join(etc, "pre.sh"), f"#!/bin/sh\n{pre}", 0o700)
    post_sh = write_file(os.path.join(etc, "post.sh"), f"#!/bin/sh\n{post}", 0o700)
    plugin = {"pluginName": "ScriptRunner", "appName": app_name,
              "preScriptLocation": pre_sh, "postScriptLocation": post_sh,
              "preScriptParams": [], "postScriptParams": [], "preScriptNoOfRetries": 0,
              "postScriptNoOfRetries": 0, "timeoutInSeconds": script_timeout, "continueBackupOnFailure": True,
              "fsFreezeEnabled": True}
    pj = write_file(os.path.join(etc, "VMSnapshotScriptPluginConfig.json"),
                    orjson.dumps(plugin, option=orjson.OPT_INDENT_2).decode(), 0o600)
    # Without quiesce: no plugin at all, so a run says what its snapshot is (file-system consistent).
    plugins = (f"numberOfPlugins = 1\npluginName0 = ScriptRunner\npluginPath0 = {etc}\n"
               f"pluginConfigPath0 = {pj}\n") if quiesce else "numberOfPlugins = 0\n"
    return write_file(os.path.join(etc, "VMSnapshotPluginHost.conf"), f"[pre_post]\ntimeoutInSeconds = 60\n{plugins}",
                      0o600)
