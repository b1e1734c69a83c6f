#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: ipclusterd contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r'''
---
module: deploy
short_description: Deploy (a canary too), promote, roll back or reap an ipclusterd app's generations
version_added: 0.1.0
description:
  - V(deploy) starts a new generation of the app from the configuration the daemon read last (with overrides for
    this generation only, as C(ipclusterctl deploy) takes them) and waits until it is live.
  - With O(canary), V(deploy) starts the new generation on that many bands only and waits until it serves them as
    a canary beside the live generation; V(promote) then moves every band to it, and V(rollback) ends it. With
    O(canary_for) as well, the daemon promotes it by itself after that long unless one of its workers fails first
    (then rolls it back, and the task fails), and the task waits for either.
  - V(rollback) goes back to an earlier generation (O(generation), or the one live before), with the same workers
    when they still run, else as a new generation running what it ran.
  - V(kill_retired) stops the app's retired workers, and draining ones (whose clients go to the live generation first).
  - A deploy whose workers do not become ready fails with the daemon's error (C(org.ipcluster1.Error.DeployFailed)),
    and the previous generation keeps serving. Errors carry the daemon's D-Bus error name and message.
  - Runs C(ipclusterctl --json) on the managed host with argument lists, never through a shell.
author:
  - ipclusterd contributors (!UNKNOWN)
attributes:
  check_mode:
    support: full
    description: Says what would change without calling the daemon's methods that change anything.
  diff_mode:
    support: none
    description: A deploy has no file to compare; the app module shows the app file's diff.
options:
  app:
    description:
      - The app's name.
    type: str
    required: true
  action:
    description:
      - What to do.
    type: str
    choices: [deploy, promote, rollback, kill_retired]
    default: deploy
  generation:
    description:
      - With O(action=rollback), the generation to return to; by default the newest one, other than the live one,
        that was live before.
    type: int
  workers:
    description:
      - With O(action=deploy), the number of workers of this generation (a power of two).
    type: int
  env:
    description:
      - With O(action=deploy), extra environment of this generation, merged over the app file's.
    type: dict
  command:
    description:
      - With O(action=deploy), the worker's argv for this generation.
    type: list
    elements: str
  workdir:
    description:
      - With O(action=deploy), the working directory of this generation.
    type: str
  canary:
    description:
      - With O(action=deploy), deploy a canary on this many bands (at least 1, fewer than the app's workers), spread
        over the band space; the live generation keeps the other bands until V(promote) or V(rollback).
    type: int
  canary_for:
    description:
      - With O(canary), a duration (V(10m)) after which the daemon promotes the canary by itself if none of its
        workers crashed, was replaced or failed a health check; it rolls it back at the first that does. O(timeout)
        must cover it.
    type: str
  wait:
    description:
      - Wait until the new generation is live (with O(canary) and no O(canary_for), until it serves as a canary).
        Without it, a deploy returns once the generation has a number.
    type: bool
    default: true
  timeout:
    description:
      - How long to wait, in seconds. When it runs out the module fails and the deploy goes on in the daemon.
    type: int
    default: 300
notes:
  - A deploy with overrides runs code of the caller's choosing; a caller other than root needs polkit's
    C(org.ipcluster1.override).
seealso:
  - module: ipcluster.ipclusterd.app
'''

EXAMPLES = r'''
- name: Deploy web with 8 workers for this generation
  ipcluster.ipclusterd.deploy:
    app: web
    workers: 8
    env:
      FEATURE_X: "on"

- name: Roll web back to generation 3
  ipcluster.ipclusterd.deploy:
    app: web
    action: rollback
    generation: 3

- name: A canary of web on 2 bands, promoted by the daemon after 10 minutes unless it fails
  ipcluster.ipclusterd.deploy:
    app: web
    canary: 2
    canary_for: 10m
    timeout: 900

- name: Promote web's canary
  ipcluster.ipclusterd.deploy:
    app: web
    action: promote

- name: Reap web's retired workers
  ipcluster.ipclusterd.deploy:
    app: web
    action: kill_retired
'''

RETURN = r'''
generation_before:
  description: The generation live before (null if none).
  returned: always
  type: int
  sample: 3
generation:
  description: The generation the action made live (V(deploy), V(promote), V(rollback)), the canary (V(deploy) with
    O(canary)), or the one live after (V(kill_retired)).
  returned: always
  type: int
  sample: 4
state:
  description: The new generation's state (V(live); V(canary) for a canary; V(starting) with O(wait=false)).
  returned: when a generation was deployed, promoted or rolled back to
  type: str
  sample: live
stopping:
  description: How many retired workers began to stop.
  returned: with O(action=kill_retired)
  type: int
error:
  description: The daemon's D-Bus error name, when the daemon refused or failed.
  returned: failure
  type: str
  sample: org.freedesktop.DBus.Error.InvalidArgs
error_message:
  description: The daemon's message.
  returned: failure
  type: str
'''

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.ipcluster.ipclusterd.plugins.module_utils.ipclusterctl import (
    APP_NAME,
    Ctl,
    CtlError,
    WaitTimeout,
    live_generation,
    newest_in,
)


def overrides(params):
    """ipclusterctl deploy's options for the module's, the argv override last (it takes the rest
    of the line)."""
    args = []
    if params['workers'] is not None:
        args += ['--workers', str(params['workers'])]
    for key in sorted(params['env'] or {}):
        args += ['--env', '%s=%s' % (key, params['env'][key])]
    if params['workdir'] is not None:
        args += ['--workdir', params['workdir']]
    if params['canary'] is not None:
        args += ['--canary', str(params['canary'])]
    if params['canary_for'] is not None:
        args += ['--canary-for', params['canary_for']]
    if params['command']:
        args += ['--command'] + list(params['command'])
    return args


def main():
    module = AnsibleModule(
        argument_spec=dict(
            app=dict(type='str', required=True),
            action=dict(type='str', choices=['deploy', 'promote', 'rollback', 'kill_retired'], default='deploy'),
            generation=dict(type='int'),
            workers=dict(type='int'),
            env=dict(type='dict'),
            command=dict(type='list', elements='str'),
            workdir=dict(type='str'),
            canary=dict(type='int'),
            canary_for=dict(type='str'),
            wait=dict(type='bool', default=True),
            timeout=dict(type='int', default=300),
        ),
        required_by=dict(canary_for='canary'),
        supports_check_mode=True,
    )
    p = module.params
    app, action = p['app'], p['action']
    if not APP_NAME.match(app):
        module.fail_json(msg='app %r is not an app name (^[a-z][a-z0-9_]{0,23}$)' % app,
                         error='org.freedesktop.DBus.Error.InvalidArgs')
    given = [k for k in ('workers', 'env', 'command', 'workdir', 'canary', 'canary_for') if p[k] is not None]
    if action != 'deploy' and given:
        module.fail_json(msg='%s apply to action=deploy only' % ', '.join(given))
    if action != 'rollback' and p['generation'] is not None:
        module.fail_json(msg='generation applies to action=rollback only')
    ctl = Ctl(module)
    deadline = time.monotonic() + p['timeout']
    result = dict(changed=False, generation_before=None, generation=None)

    def fail(e, what):
        # The daemon changed nothing: a failed deploy leaves the previous generation serving.
        result['changed'] = False
        if isinstance(e, CtlError):
            result.update(e.result())
        else:
            # What was started goes on in the daemon.
            result.update(changed=True, error='timeout', error_message=str(e))
            e = '%s; it goes on in ipclusterd (ipclusterctl generations %s)' % (e, app)
        try:
            live = live_generation(ctl.generations(app))
            result['generation'] = live['generation'] if live else None
        except CtlError:
            pass
        module.fail_json(msg='%s %s: %s' % (what, app, e), **result)

    try:
        rows = ctl.generations(app)
    except CtlError as e:
        fail(e, 'listing the generations of')
    if rows is None:
        fail(CtlError('org.ipcluster1.Error.NoSuchApp', 'no app "%s"' % app), action.replace('_', ' '))
    live = live_generation(rows)
    result['generation_before'] = result['generation'] = live['generation'] if live else None

    if action == 'kill_retired':
        retired = sum(g['workers'] for g in rows if g['state'] in ('retired', 'draining'))
        result['changed'] = retired > 0
        if not module.check_mode and retired:
            try:
                result['stopping'] = ctl.run(['kill-retired', app])['stopping']
            except CtlError as e:
                fail(e, 'kill retired of')
            result['changed'] = result['stopping'] > 0
        else:
            result['stopping'] = retired if module.check_mode else 0
        module.exit_json(**result)

    if action == 'promote':
        # Idempotent: with no canary there is nothing to promote, and nothing changes.
        canary = newest_in(rows, 'canary')
        result['changed'] = canary is not None
        if canary is None or module.check_mode:
            if canary is not None:
                result['generation'], result['state'] = canary['generation'], 'live'
            module.exit_json(**result)
        try:
            doc = ctl.run(['promote', app], timeout=deadline - time.monotonic())
            result['generation'], result['state'] = doc['generation'], doc.get('state')
        except (CtlError, WaitTimeout) as e:
            fail(e, 'promoting the canary of')
        module.exit_json(**result)

    if action == 'rollback':
        target = p['generation']
        # During a canary a rollback ends it, whatever generation it names, and the live one
        # stays live: a change, though the live generation is the same.
        ends_canary = newest_in(rows, 'canary') is not None
        if target is not None and target == result['generation_before'] and not ends_canary:
            module.exit_json(**result)
        result['changed'] = True
        if module.check_mode:
            module.exit_json(**result)
        try:
            args = ['rollback', app] + ([str(target)] if target is not None else [])
            doc = ctl.run(args, timeout=deadline - time.monotonic())
            result['generation'], result['state'] = doc['generation'], doc.get('state')
        except (CtlError, WaitTimeout) as e:
            fail(e, 'rolling back')
        result['changed'] = ends_canary or result['generation'] != result['generation_before']
        module.exit_json(**result)

    # deploy: a new generation every time it runs.
    result['changed'] = True
    if module.check_mode:
        module.exit_json(**result)
    try:
        if p['wait']:
            result['generation'], result['state'] = ctl.deploy(
                app, overrides(p), deadline, canary=p['canary'] is not None and p['canary_for'] is None)
        else:
            doc = ctl.run(['deploy', app, '--no-block'] + overrides(p), timeout=deadline - time.monotonic())
            result['generation'], result['state'] = doc['generation'], doc.get('state')
    except (CtlError, WaitTimeout) as e:
        fail(e, 'deploying')
    module.exit_json(**result)


if __name__ == '__main__':
    main()
