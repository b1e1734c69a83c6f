# -*- coding: utf-8 -*-
# Copyright: ipclusterd contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)

"""What the ipcluster.ipclusterd modules share: ipclusterctl --json on the managed host, run
with an argument list (never through a shell), its errors, and waiting for a generation."""

from __future__ import annotations

import json
import math
import re
import time

# What the daemon accepts as an app name (it becomes part of unit and chain names).
APP_NAME = re.compile(r'^[a-z][a-z0-9_]{0,23}$')

# Where the daemon reads app files.
APPS_DIR = '/etc/ipcluster/apps'

# What a wait for a new generation makes of a state.
PENDING = 'pending'  # not there yet: keep waiting
REACHED = 'reached'  # what the wait is for
FAILED = 'failed'  # it will not get there

# Every state ListGenerations gives, in this one place: what a wait for a new generation makes of
# it, and whether the generation's workers run (what StopApp stops). A state the daemon gains (a
# canary generation, a draining one) is one line here. A state not listed is waited on, and taken
# for running.
STATES = {
    'starting': (PENDING, True),
    # Serves some bands beside the live generation until promoted (or rolled back): what a
    # canary deploy waits for (see wait_outcome), and not yet live for any other wait.
    'canary': (PENDING, True),
    'live': (REACHED, True),
    # It went live and was replaced since (another deploy): not what was asked for.
    'retired': (FAILED, True),
    # Replaced, but its clients with sessions still reach it (session_affinity).
    'draining': (FAILED, True),
    'failed': (FAILED, False),
    'stopped': (FAILED, False),
}


def wait_outcome(state, canary=False):
    """PENDING, REACHED or FAILED for a waiter of a generation in `state`; a waiter of a canary
    deploy (`canary`) has what it waits for once the canary serves its bands."""
    if canary and state == 'canary':
        return REACHED
    return STATES.get(state, (PENDING, True))[0]


def runs(state):
    """Whether a generation in `state` has workers running."""
    return STATES.get(state, (PENDING, True))[1]


# Exit status of timeout(1) when the time ran out.
TIMED_OUT = 124


class CtlError(Exception):
    """ipclusterctl failed: the D-Bus error name (None when ipclusterctl gave none), the
    daemon's message, and ipclusterctl's exit status."""

    def __init__(self, name, message, rc=1):
        super(CtlError, self).__init__('%s: %s' % (name, message) if name else message)
        self.name = name
        self.message = message
        self.rc = rc

    def result(self):
        """What a module returns besides msg."""
        return dict(error=self.name, error_message=self.message, rc=self.rc)


class WaitTimeout(Exception):
    """The time ran out; the daemon goes on with what it was doing."""


class Ctl(object):
    """ipclusterctl --json on this host."""

    def __init__(self, module):
        self.module = module
        self.path = module.get_bin_path('ipclusterctl', required=True, opt_dirs=['/usr/local/bin'])

    def run(self, args, timeout=None):
        """ipclusterctl --json ARGS; its JSON document. Raises CtlError with the daemon's error
        name and message, or WaitTimeout after `timeout` seconds (a deploy goes on in the
        daemon)."""
        argv = [self.path, '--json'] + [str(a) for a in args]
        if timeout is not None:
            # timeout(1) from coreutils: run_command has no time limit of its own.
            timeout = max(1, int(math.ceil(timeout)))
            argv = [self.module.get_bin_path('timeout', required=True), '--kill-after=10', '%ds' % timeout] + argv
        rc, out, err = self.module.run_command(argv, environ_update=dict(LANG='C.UTF-8'))
        if timeout is not None and rc == TIMED_OUT:
            raise WaitTimeout('ipclusterctl %s did not finish within %ds' % (' '.join(args[:2]), timeout))
        try:
            doc = json.loads(out) if out.strip() else None
        except ValueError:
            doc = None
        if rc != 0:
            if isinstance(doc, dict) and 'error' in doc:
                raise CtlError(doc['error'], doc.get('message') or '', rc)
            raise CtlError(None, (err or out).strip() or 'ipclusterctl exited %d' % rc, rc)
        return doc

    def version(self):
        return self.run(['version'])['version']

    def generations(self, app):
        """The app's generations (oldest first), or None when the daemon knows no such app."""
        try:
            rows = self.run(['generations', app])
        except CtlError as e:
            if e.name == 'org.ipcluster1.Error.NoSuchApp':
                return None
            raise
        return sorted(rows, key=lambda g: g['generation'])

    def check_config(self, path):
        """check-config of one file: its errors (empty when valid) and warnings."""
        argv = [self.path, '--json', 'check-config', path]
        rc, out, err = self.module.run_command(argv, environ_update=dict(LANG='C.UTF-8'))
        try:
            report = json.loads(out)[0]
        except (ValueError, IndexError, KeyError, TypeError):
            raise CtlError(None, (err or out).strip() or 'ipclusterctl check-config exited %d' % rc, rc)
        errors = [report['error']] if report.get('error') else []
        if rc != 0 and not errors:
            errors = [(err or out).strip()]
        return errors, report.get('warnings') or []

    def deploy(self, app, args, deadline, canary=False):
        """ipclusterctl deploy APP ARGS (the `--command` override last); waits until the new
        generation is in a state STATES calls reached (`canary`: or serves as a canary), or until
        `deadline` (time.monotonic()). Returns the generation and its state."""
        doc = self.run(['deploy', app] + list(args), timeout=deadline - time.monotonic())
        generation, state = doc['generation'], doc.get('state')
        if wait_outcome(state, canary) != REACHED:
            state = self.wait_for(app, generation, deadline, canary=canary)
        return generation, state

    def wait_for(self, app, generation, deadline, interval=0.25, canary=False):
        """Waits until `generation` of `app` reaches a state STATES calls reached (`canary`: or
        serves as a canary); its state. Raises CtlError when it fails (the journal has the
        daemon's reason), WaitTimeout at `deadline` (time.monotonic())."""
        state = None
        while True:
            rows = self.generations(app) or []
            state = next((g['state'] for g in rows if g['generation'] == generation), None)
            outcome = wait_outcome(state, canary)
            if outcome == REACHED:
                return state
            if outcome == FAILED:
                raise CtlError(
                    'org.ipcluster1.Error.DeployFailed',
                    '%s generation %d is %s (journalctl -u ipclusterd says why)' % (app, generation, state))
            if time.monotonic() >= deadline:
                raise WaitTimeout('%s generation %d is still %s' % (app, generation, state or 'not listed'))
            time.sleep(interval)


def newest_in(rows, state):
    """The newest of ListGenerations rows (oldest first) in `state`, or None."""
    found = [g for g in rows or [] if g['state'] == state]
    return found[-1] if found else None


def live_generation(rows):
    """The live generation of ListGenerations rows, or None."""
    return newest_in(rows, 'live')


def running(rows):
    """Whether any generation's workers run."""
    return any(runs(g['state']) for g in rows or [])
