#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: ipclusterd contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r'''
---
module: app
short_description: An ipclusterd app, its file and its live generation
version_added: 0.1.0
description:
  - Writes the app file C(/etc/ipcluster/apps/<name>.toml) from the module's options (owner root, mode 0644, as the
    daemon requires), after C(ipclusterctl check-config) on the managed host found it valid; then has the daemon read
    it (Reload) and deploys when it changed, waiting until the new generation is live.
  - The order is the daemon's. A Deploy uses the configuration read at the last Reload, so the file is written and
    reloaded first. A new app with O(autostart=true) starts on that Reload; the module waits for that generation
    instead of deploying again. O(state=absent) stops the app (StopApp) before it removes the file and reloads.
  - A deploy whose new workers do not become ready fails with the daemon's error (C(org.ipcluster1.Error.DeployFailed))
    and changes nothing; the app file is put back as it was (removed, for a new app), and the previous generation
    keeps serving.
  - Idempotent. With O(deploy=changed), a run deploys when the file's content changes, when no generation is live, and
    when the live generation started before the file was last written (a deploy that did not happen, after a run
    that timed out, a generation rolled back or an earlier run with O(deploy=never)). Otherwise it changes nothing and says so.
  - Runs C(ipclusterctl --json) on the managed host with argument lists, never through a shell. C(ipclusterctl) and
    C(timeout) (coreutils) must be on the managed host.
author:
  - ipclusterd contributors (!UNKNOWN)
attributes:
  check_mode:
    support: full
    description: Validates the file with C(ipclusterctl check-config) and says whether it would write and deploy.
  diff_mode:
    support: full
    description: The app file's change, and which generation would be (or was) deployed.
options:
  name:
    description:
      - The app's name, the file's stem. V(^[a-z][a-z0-9_]{0,23}$).
    type: str
    required: true
  state:
    description:
      - V(present), the file as given and a live generation running it; V(stopped), the file as given and every
        generation stopped (StopApp; the app stays stopped until the next deploy); V(absent), the app stopped and its
        file removed.
    type: str
    choices: [present, stopped, absent]
    default: present
  deploy:
    description:
      - With O(state=present), when to deploy. V(changed), when the live generation does not run the file (see above);
        V(always), on every run (a new generation with the same file); V(never), only write the file and reload (a new
        app with O(autostart) still starts on that Reload).
    type: str
    choices: [changed, always, never]
    default: changed
  timeout:
    description:
      - How long to wait, in seconds, for the new generation to be live. When it runs out the module fails and the
        deploy goes on in the daemon.
    type: int
    default: 300
  command:
    description:
      - The worker's argv, executed directly (never through a shell). Required unless O(state=absent).
    type: list
    elements: str
  workers:
    description:
      - Number of bands, a power of two, 1 to 1024.
    type: int
  listen:
    description:
      - The public addresses, V(address:port), IPv4 or IPv6 (V([::]:80)). Required unless O(state=absent).
    type: list
    elements: str
  routing:
    description:
      - V(nat) (kernel NAT rules) or V(socket) (sockets handed to the workers, steered by eBPF).
    type: str
    choices: [nat, socket]
  port_range:
    description:
      - NAT mode, where worker ports are allocated, V(lo-hi).
    type: str
  ready:
    description:
      - How a worker tells it is ready; V(http) also waits for its first health check to pass (needs O(health_path)).
    type: str
    choices: [tcp, notify, http]
  ready_timeout:
    description:
      - A band not ready by then fails the deploy (a duration, V(30s)).
    type: str
  working_directory:
    description:
      - The workers' working directory, an absolute path.
    type: str
  user:
    description:
      - Run workers as this user.
    type: str
  environment:
    description:
      - Extra environment of the workers; values are written as strings.
    type: dict
  stop_signal:
    description:
      - Signal that stops a worker (V(SIGTERM)).
    type: str
  stop_timeout:
    description:
      - Then SIGKILL (a duration).
    type: str
  retire_signal:
    description:
      - Signal sent to a worker when it is retired.
    type: str
  retire_nice:
    description:
      - Added to a retired worker's nice value, 0 to 19.
    type: int
  autostart:
    description:
      - Deploy when the daemon starts, or on Reload, if the app has no live generation.
    type: bool
  worker_memory_max:
    description:
      - A live worker above this RSS is replaced (a size, V(448M)).
    type: str
  cluster_memory_max:
    description:
      - Budget for the RSS of all the app's workers (a size).
    type: str
  retire_rate:
    description:
      - At most N memory and watchdog retirements per window, V(N/duration).
    type: str
  retire_timeout:
    description:
      - Retired workers older than this are stopped (a duration).
    type: str
  reap_interval:
    description:
      - Pause between stopping successive retired workers (a duration).
    type: str
  spawn_interval:
    description:
      - Pause between starting successive workers of a generation (a duration).
    type: str
  watchdog:
    description:
      - Workers must send C(WATCHDOG=1) at least this often (a duration; needs O(ready=notify)).
    type: str
  restart_backoff:
    description:
      - Delay before respawning a crashed band, V(min-max).
    type: str
  session_affinity:
    description:
      - A client keeps the generation that holds its session until idle this long (a duration up to V(24h); V(0) is off).
    type: str
  max_draining:
    description:
      - How many generations may keep their clients' sessions at once (1 to 6).
    type: int
  health_path:
    description:
      - The path each worker's HTTP health check requests (V(/healthz)); none without it.
    type: str
  health_interval:
    description:
      - How often each worker is checked (a duration, V(5s)).
    type: str
  health_timeout:
    description:
      - A check without a status line by then failed (a duration, V(2s)).
    type: str
  health_failures:
    description:
      - Failed checks in a row that get a live worker replaced (1 to 100).
    type: int
notes:
  - The keys are those of the configuration reference (docs/config.md); a key left out gets the daemon's default.
    Values are checked by the daemon's own parser (C(ipclusterctl check-config)), whose message names the key.
seealso:
  - module: ipcluster.ipclusterd.deploy
  - module: ipcluster.ipclusterd.info
'''

EXAMPLES = r'''
- name: Run web, deploying when its file changes
  ipcluster.ipclusterd.app:
    name: web
    command: [/usr/bin/node, /srv/web/server.js]
    workers: 8
    listen: ["[::]:80"]
    ready: notify
    environment:
      NODE_ENV: production
  register: web

- name: Show what changed
  ansible.builtin.debug:
    msg: "generation {{ web.generation_before }} -> {{ web.generation }}"

- name: Stop web, keeping its file
  ipcluster.ipclusterd.app:
    name: web
    state: stopped
    command: [/usr/bin/node, /srv/web/server.js]
    listen: ["[::]:80"]

- name: Remove web
  ipcluster.ipclusterd.app:
    name: web
    state: absent
'''

RETURN = r'''
file:
  description: The app file.
  returned: always
  type: str
  sample: /etc/ipcluster/apps/web.toml
file_changed:
  description: Whether the app file was (or, in check mode, would be) written or removed.
  returned: always
  type: bool
deployed:
  description: Whether a new generation was (or would be) started, by a Deploy or by the Reload's autostart.
  returned: always
  type: bool
stopped:
  description: Whether the app was (or would be) stopped.
  returned: always
  type: bool
generation_before:
  description: The generation live before the module ran (null if none).
  returned: always
  type: int
  sample: 3
generation:
  description: The generation live now (null if none; in check mode, as before).
  returned: always
  type: int
  sample: 4
msg:
  description: What changed, or that nothing did.
  returned: always
  type: str
  sample: "web: nothing to change (generation 4 is live)"
warnings_config:
  description: What C(ipclusterctl check-config) warned about (a port range in the ephemeral ports, say).
  returned: when the file was checked
  type: list
  elements: str
error:
  description: The daemon's D-Bus error name, when the daemon refused or failed.
  returned: failure
  type: str
  sample: org.ipcluster1.Error.DeployFailed
error_message:
  description: The daemon's message.
  returned: failure
  type: str
'''

import os
import shutil
import tempfile
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_bytes, to_text

from ansible_collections.ipcluster.ipclusterd.plugins.module_utils.ipclusterctl import (
    APP_NAME,
    APPS_DIR,
    Ctl,
    CtlError,
    WaitTimeout,
    live_generation,
    running,
)

# The app file's keys, in the configuration reference's order, and their argument specs.
CONFIG = [
    ('command', dict(type='list', elements='str')),
    ('workers', dict(type='int')),
    ('listen', dict(type='list', elements='str')),
    ('routing', dict(type='str', choices=['nat', 'socket'])),
    ('port_range', dict(type='str')),
    ('ready', dict(type='str', choices=['tcp', 'notify', 'http'])),
    ('ready_timeout', dict(type='str')),
    ('working_directory', dict(type='str')),
    ('user', dict(type='str')),
    ('environment', dict(type='dict')),
    ('stop_signal', dict(type='str')),
    ('stop_timeout', dict(type='str')),
    ('retire_signal', dict(type='str')),
    ('retire_nice', dict(type='int')),
    ('autostart', dict(type='bool')),
    ('worker_memory_max', dict(type='str')),
    ('cluster_memory_max', dict(type='str')),
    ('retire_rate', dict(type='str')),
    ('retire_timeout', dict(type='str')),
    ('reap_interval', dict(type='str')),
    ('spawn_interval', dict(type='str')),
    ('watchdog', dict(type='str')),
    ('restart_backoff', dict(type='str')),
    ('session_affinity', dict(type='str')),
    ('max_draining', dict(type='int')),
    ('health_path', dict(type='str')),
    ('health_interval', dict(type='str')),
    ('health_timeout', dict(type='str')),
    ('health_failures', dict(type='int')),
]

HEADER = '# Written by Ansible (ipcluster.ipclusterd.app); changes made here are overwritten.\n'

# TOML's escapes for the characters a basic string cannot hold as they are.
ESCAPES = {'"': '\\"', '\\': '\\\\', '\b': '\\b', '\t': '\\t', '\n': '\\n', '\f': '\\f', '\r': '\\r'}


def toml_string(value):
    out = []
    for ch in to_text(value):
        if ch in ESCAPES:
            out.append(ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7f:
            out.append('\\u%04x' % ord(ch))
        else:
            out.append(ch)
    return '"' + ''.join(out) + '"'


def toml_value(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        pairs = ['%s = %s' % (toml_string(k), toml_string(value[k])) for k in sorted(value)]
        return '{ %s }' % ', '.join(pairs) if pairs else '{}'
    if isinstance(value, (list, tuple)):
        return '[%s]' % ', '.join(toml_string(v) for v in value)
    return toml_string(value)


def render(params):
    """The app file for the module's options (keys not given are left to the daemon)."""
    lines = [HEADER]
    for key, _spec in CONFIG:
        value = params[key]
        if value is not None:
            lines.append('%s = %s\n' % (key, toml_value(value)))
    return ''.join(lines)


class App(object):
    def __init__(self, module):
        self.module = module
        self.name = module.params['name']
        self.path = os.path.join(APPS_DIR, self.name + '.toml')
        self.ctl = Ctl(module)
        self.result = dict(changed=False, file=self.path, file_changed=False, deployed=False, stopped=False,
                           generation_before=None, generation=None)
        self.diff = []
        self.deadline = time.monotonic() + module.params['timeout']

    def fail(self, msg, **extra):
        self.result.update(extra)
        self.result['changed'] = self.result['file_changed'] or self.result['deployed'] or self.result['stopped']
        self.module.fail_json(msg=msg, **self.result)

    def fail_ctl(self, e, what):
        self.fail('%s: %s' % (what, e), **e.result())

    def read(self):
        """The file's current content and stat, or (None, None)."""
        try:
            with open(self.path, 'rb') as f:
                return to_text(f.read(), errors='surrogate_or_strict'), os.stat(self.path)
        except FileNotFoundError:
            return None, None

    def generations(self):
        try:
            return self.ctl.generations(self.name)
        except CtlError as e:
            self.fail_ctl(e, 'listing the generations of %s' % self.name)

    def live(self):
        g = live_generation(self.generations())
        return g['generation'] if g else None

    def check(self, content):
        """Refuses `content` unless the daemon's parser accepts it (check-config on a copy)."""
        tmp = tempfile.mkdtemp(dir=self.module.tmpdir)
        try:
            draft = os.path.join(tmp, self.name + '.toml')
            with open(draft, 'wb') as f:
                f.write(to_bytes(content))
            errors, warnings = self.ctl.check_config(draft)
        except CtlError as e:
            self.fail_ctl(e, 'checking the app file')
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.result['warnings_config'] = warnings
        for w in warnings:
            self.module.warn(w.replace(draft, self.path))
        if errors:
            self.fail('the app file is invalid: %s' % '; '.join(e.replace(draft, self.path) for e in errors),
                      error='org.ipcluster1.Error.InvalidConfig', error_message='; '.join(errors))

    def attributes_differ(self, st):
        return st is not None and (st.st_uid != 0 or st.st_gid != 0 or (st.st_mode & 0o7777) != 0o644)

    def write(self, content):
        """Writes the file, owner root and mode 0644 from the start: a temporary file in the same
        directory (a name the daemon does not read), renamed over it."""
        if not os.path.isdir(APPS_DIR):
            os.makedirs(APPS_DIR, 0o755)
        fd, tmp = tempfile.mkstemp(dir=APPS_DIR, prefix='.%s.' % self.name, suffix='.ansible-tmp')
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(to_bytes(content))
                f.flush()
                os.fsync(f.fileno())
            os.chown(tmp, 0, 0)
            os.chmod(tmp, 0o644)
            os.rename(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def fix_attributes(self):
        os.chown(self.path, 0, 0)
        os.chmod(self.path, 0o644)

    def put(self, content, changed):
        """Writes the file when its content changed, else gives it back owner root and mode 0644
        when only those changed."""
        if changed:
            self.write(content)
        elif self.result['file_changed']:
            self.fix_attributes()

    def restore(self, content, st):
        """Puts the file back as it was (its content and time stamp), or removes it, and reloads."""
        if content is None:
            if os.path.exists(self.path):
                os.unlink(self.path)
        else:
            self.write(content)
            os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.ctl.run(['reload'])

    def diff_file(self, before, after):
        self.diff.append(dict(before_header=self.path, after_header=self.path, before=before or '',
                              after=after or ''))

    def diff_live(self, before, after):
        shown = dict(before_header='%s: live generation' % self.name, after_header='%s: live generation' % self.name)
        shown['before'] = 'generation %s\n' % before if before is not None else 'none\n'
        shown['after'] = after
        self.diff.append(shown)

    def done(self):
        r = self.result
        r['changed'] = r['file_changed'] or r['deployed'] or r['stopped']
        would = 'would be ' if self.module.check_mode else ''
        said = []
        if r['file_changed']:
            said.append('%s %s%s' % (self.path, would, 'removed' if self.module.params['state'] == 'absent' else 'written'))
        if r['deployed']:
            said.append('a new generation %sdeployed' % would if self.module.check_mode
                        else 'generation %s is live' % r['generation'])
        if r['stopped']:
            said.append('%s %sstopped' % (self.name, would))
        if not said:
            live = 'generation %s is live' % r['generation'] if r['generation'] is not None else 'nothing runs'
            said.append('nothing to change (%s)' % live)
        r['msg'] = '%s: %s' % (self.name, '; '.join(said))
        if self.module._diff:
            self.result['diff'] = self.diff
        self.module.exit_json(**self.result)

    def present(self):
        p = self.module.params
        for required in ('command', 'listen'):
            if not p[required]:
                self.fail('%s is required with state=%s' % (required, p['state']))
        content = render(p)
        self.check(content)
        before, st = self.read()
        rows = self.generations()
        live = live_generation(rows)
        self.result['generation_before'] = self.result['generation'] = live['generation'] if live else None
        changed = before != content
        self.result['file_changed'] = changed or self.attributes_differ(st)
        if changed:
            self.diff_file(before, content)
        if p['state'] == 'stopped':
            return self.stopped(content, before, st, rows)
        deploy = p['deploy'] == 'always' or (p['deploy'] == 'changed' and (changed or self.stale(live, st)))
        if self.module.check_mode:
            self.result['deployed'] = deploy
            if deploy:
                self.diff_live(self.result['generation_before'], 'a new generation (deploy)\n')
            return self.done()
        newest = rows[-1]['generation'] if rows else 0
        try:
            self.put(content, changed)
            # A Deploy uses the configuration read at the last Reload.
            if self.result['file_changed'] or deploy or rows is None:
                self.ctl.run(['reload'])
            # The Reload's autostart may have started a generation: wait for it, do not deploy again.
            started = [g for g in self.generations() or [] if g['generation'] > newest]
            if started:
                self.ctl.wait_for(self.name, started[-1]['generation'], self.deadline)
                self.result['deployed'] = True
            elif deploy:
                self.ctl.deploy(self.name, [], self.deadline)
                self.result['deployed'] = True
        except WaitTimeout as e:
            # The deploy goes on: the file stays as written.
            self.result['deployed'] = True
            self.fail('%s; the deploy goes on in ipclusterd (ipclusterctl generations %s)' % (e, self.name),
                      error='timeout', error_message=str(e))
        except CtlError as e:
            # Nothing changes: the previous generation kept serving; the file goes back as it was.
            if changed:
                try:
                    self.restore(before, st)
                except CtlError as restore_error:
                    self.fail_ctl(e, 'deploying %s (and putting its file back failed: %s)' % (self.name, restore_error))
            self.result['generation'] = self.live()
            self.result['file_changed'] = False
            self.fail_ctl(e, 'deploying %s' % self.name)
        self.result['generation'] = self.live()
        if self.result['deployed']:
            self.diff_live(self.result['generation_before'], 'generation %s\n' % self.result['generation'])
        return self.done()

    def stale(self, live, st):
        """Whether the live generation does not run the file: none is live, or it started before
        the file was last written."""
        if live is None:
            return True
        return st is not None and st.st_mtime_ns // 1000 > live['start_usec']

    def stopped(self, content, before, st, rows):
        changed = before != content
        self.result['stopped'] = running(rows)
        if self.module.check_mode:
            return self.done()
        newest = rows[-1]['generation'] if rows else 0
        try:
            self.put(content, changed)
            if self.result['file_changed'] or rows is None:
                self.ctl.run(['reload'])
            rows = self.generations() or []
            # A new app with autostart starts on that Reload: stop it once it settled (StopApp
            # refuses an app while it deploys).
            started = [g for g in rows if g['generation'] > newest and g['state'] == 'starting']
            for g in started:
                try:
                    self.ctl.wait_for(self.name, g['generation'], self.deadline)
                except CtlError:
                    pass
            rows = self.generations() or []
            if running(rows):
                self.ctl.run(['stop', self.name])
                self.result['stopped'] = True
        except (CtlError, WaitTimeout) as e:
            if isinstance(e, CtlError):
                self.fail_ctl(e, 'stopping %s' % self.name)
            self.fail(str(e))
        self.result['generation'] = self.live()
        return self.done()

    def absent(self):
        before, _st = self.read()
        rows = self.generations()
        live = live_generation(rows)
        self.result['generation_before'] = live['generation'] if live else None
        self.result['stopped'] = running(rows)
        self.result['file_changed'] = before is not None
        if before is not None:
            self.diff_file(before, None)
        if self.module.check_mode:
            self.result['generation'] = self.result['generation_before']
            return self.done()
        try:
            if self.result['stopped']:
                self.ctl.run(['stop', self.name])
            if before is not None:
                os.unlink(self.path)
                self.ctl.run(['reload'])
        except CtlError as e:
            self.fail_ctl(e, 'removing %s' % self.name)
        return self.done()


def main():
    spec = dict(
        name=dict(type='str', required=True),
        state=dict(type='str', choices=['present', 'stopped', 'absent'], default='present'),
        deploy=dict(type='str', choices=['changed', 'always', 'never'], default='changed'),
        timeout=dict(type='int', default=300),
    )
    spec.update(dict(CONFIG))
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    if not APP_NAME.match(module.params['name']):
        module.fail_json(msg='name %r is not an app name (^[a-z][a-z0-9_]{0,23}$)' % module.params['name'],
                         error='org.freedesktop.DBus.Error.InvalidArgs')
    app = App(module)
    if module.params['state'] == 'absent':
        app.absent()
    else:
        app.present()


if __name__ == '__main__':
    main()
