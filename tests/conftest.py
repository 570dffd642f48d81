"""Fixtures shared by nsbuild's tests. The helpers themselves live in tests/support/.

Accounts: when the suite runs as root, rootless behaviour is tested by running nsbuild as
nsbuild-test (with /etc/subuid ranges) and nsbuild-nosub (without); `make test` creates both.

    def test_x(unprivileged_user, user_tmp):       # runs once per kind of unprivileged caller
        work = user_tmp(unprivileged_user)          # /var/tmp/..., owned by that account
        proc = run_nsbuild(["layered", spec, "-o", work / "img.tar"], user=unprivileged_user)

    def test_push(registry):                        # "127.0.0.1:PORT", empty, plain http
    def test_auth(registry_factory):                # registry_factory(auth=("u", "p"), tls=True, token=False)
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from collections.abc import Iterator

import pytest
from support import users as _users
from support import verifiers as _verifiers
from support.registry import Registry, RegistryFactory, remove_registry, start_registry
from support.users import UserTmpFactory, has_subids, is_root, unprivileged_user_params

from nsbuild.tar.owners import Owner, OwnerPolicy


def pytest_report_header(config: pytest.Config) -> list[str]:
    me = pwd.getpwuid(os.geteuid()).pw_name
    lines = [f"nsbuild tests run as {me}; nsbuild = {os.path.dirname(sys.executable)}/nsbuild"]
    if is_root():
        for key, name in _users.ACCOUNTS.items():
            try:
                pwd.getpwnam(name)
                state = "with subordinate ids" if has_subids(key) else "without subordinate ids"
            except KeyError:
                state = "MISSING (run `make test-users`)"
            lines.append(f"  account {key!r} = {name}: {state}")
    else:
        lines.append(
            f"  not root: every unprivileged case runs as {me} "
            f"({'with' if has_subids(None) else 'without'} subordinate ids)"
        )
    return lines


@pytest.fixture(scope="session", autouse=True)
def _support_session_cleanup() -> Iterator[None]:
    yield
    _verifiers.cleanup_module_files()


@pytest.fixture
def owner() -> OwnerPolicy:
    """Every entry root:root, as a spec without uid/gid gives it (the tests of tar headers and content
    fingerprints)."""
    return OwnerPolicy.fixed_owner(Owner(0, 0, "root", "root"))


@pytest.fixture
def user_tmp() -> Iterator[UserTmpFactory]:
    """user_tmp(user=None) -> a new directory under /var/tmp owned by that account (mode 0755),
    removed after the test even when it holds files owned by subordinate ids."""
    factory = UserTmpFactory()
    yield factory
    factory.cleanup()


@pytest.fixture(params=unprivileged_user_params())
def unprivileged_user(request: pytest.FixtureRequest) -> str | None:
    """Each kind of unprivileged caller: "test" (has subordinate ids) and "nosub" (has none) when
    root; None (the current user) for the kind the current user is, otherwise."""
    if request.param is not None:
        _users.account(request.param)  # fails clearly when `make test-users` was not run
    return request.param


@pytest.fixture(params=unprivileged_user_params())
def unprivileged_users(request: pytest.FixtureRequest) -> str | None:
    """Alias of unprivileged_user (same parametrization), under the name the briefs use."""
    if request.param is not None:
        _users.account(request.param)
    return request.param


@pytest.fixture
def user_with_subids() -> str | None:
    """An unprivileged caller with a subordinate id range (nsbuild-test, or the current user)."""
    if is_root():
        return "test"
    if not has_subids(None):
        pytest.skip("not root and the current user has no /etc/subuid+/etc/subgid range")
    return None


@pytest.fixture
def user_without_subids() -> str | None:
    """An unprivileged caller without subordinate ids (nsbuild-nosub, or the current user)."""
    if is_root():
        return "nosub"
    if has_subids(None):
        pytest.skip("not root and the current user has subordinate ids (needs root to switch to nsbuild-nosub)")
    return None


@pytest.fixture
def registry_factory() -> Iterator[RegistryFactory]:
    """registry_factory(auth=None|(user, password), tls=False, token=False) -> Registry (empty,
    on 127.0.0.1 and a random port); every registry is stopped and removed after the test."""
    factory = RegistryFactory()
    yield factory
    factory.cleanup()


@pytest.fixture
def registry() -> Iterator[str]:
    """An empty plain-http registry without auth: yields "127.0.0.1:PORT"."""
    reg: Registry = start_registry()
    try:
        yield reg.host
    finally:
        remove_registry(reg)


@pytest.fixture
def require_podman() -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (`make deps`)")
