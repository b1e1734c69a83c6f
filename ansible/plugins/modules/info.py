#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: ipclusterd contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r'''
---
module: info
short_description: What ipclusterd runs on a host
version_added: 0.1.0
description:
  - The daemon's version, and the generations and workers of every app (or of O(app)), as C(ipclusterctl --json
    status) gives them; per app, its live generation.
  - Reads only; runs C(ipclusterctl --json) on the managed host with argument lists, never through a shell.
author:
  - ipclusterd contributors (!UNKNOWN)
attributes:
  check_mode:
    support: full
    description: It only reads.
  diff_mode:
    support: none
    description: It changes nothing.
options:
  app:
    description:
      - Only this app.
    type: str
seealso:
  - module: ipcluster.ipclusterd.app
'''

EXAMPLES = r'''
- name: What runs
  ipcluster.ipclusterd.info:
  register: ipcluster

- name: Web's live generation on each host
  ansible.builtin.debug:
    msg: "{{ ipcluster.apps.web.live }}"
'''

RETURN = r'''
version:
  description: The daemon's version.
  returned: always
  type: str
  sample: 0.1.0
apps:
  description: Per app with a generation, its live generation (null if none), its generations and its workers.
  returned: always
  type: dict
  sample:
    web:
      live: 4
      generations: [{app: web, generation: 4, state: live, workers: 4, start_usec: 1767225600000000,
                     scope: ipcluster-web-4.scope}]
      workers: [{app: web, generation: 4, band: 0, pid: 4242, state: live, ports: [{public: 80, worker: 20004}],
                 rss_bytes: 1048576, cpu_usec: 1200, start_usec: 1767225600000000, nice: 0,
                 scope: ipcluster-web-4.scope}]
generations:
  description: Every generation listed, as C(ipclusterctl --json generations) gives them.
  returned: always
  type: list
  elements: dict
workers:
  description: Every worker listed, as C(ipclusterctl --json workers) gives them.
  returned: always
  type: list
  elements: dict
error:
  description: The daemon's D-Bus error name, when the daemon refused.
  returned: failure
  type: str
  sample: org.ipcluster1.Error.NoSuchApp
error_message:
  description: The daemon's message.
  returned: failure
  type: str
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ipcluster.ipclusterd.plugins.module_utils.ipclusterctl import (
    APP_NAME,
    Ctl,
    CtlError,
    live_generation,
)


def main():
    module = AnsibleModule(argument_spec=dict(app=dict(type='str')), supports_check_mode=True)
    app = module.params['app']
    if app is not None and not APP_NAME.match(app):
        module.fail_json(msg='app %r is not an app name (^[a-z][a-z0-9_]{0,23}$)' % app,
                         error='org.freedesktop.DBus.Error.InvalidArgs')
    ctl = Ctl(module)
    try:
        version = ctl.version()
        status = ctl.run(['status'] + ([app] if app else []))
    except CtlError as e:
        module.fail_json(msg=str(e), **e.result())
    generations = sorted(status['generations'], key=lambda g: (g['app'], g['generation']))
    workers = status['workers']
    apps = {}
    for g in generations:
        apps.setdefault(g['app'], dict(live=None, generations=[], workers=[]))['generations'].append(g)
    for w in workers:
        apps.setdefault(w['app'], dict(live=None, generations=[], workers=[]))['workers'].append(w)
    for name, a in apps.items():
        live = live_generation(a['generations'])
        a['live'] = live['generation'] if live else None
    module.exit_json(changed=False, version=version, apps=apps, generations=generations, workers=workers)


if __name__ == '__main__':
    main()
