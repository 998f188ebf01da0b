"""Turn the core library's one-line errors into clean Dagster step failures (no traceback soup)."""

import functools
import inspect

import dagster as dg

from flexmf_assets.errors import FlexMFError


def as_failure(exc: FlexMFError) -> dg.Failure:
    """The step failure a user reads: ``"<ErrorClass>: <one-line message>"``, never retried."""
    return dg.Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False)


def user_errors(fn):
    """Decorator (below ``@asset``): a :class:`FlexMFError` fails the step with its one-line message."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except FlexMFError as exc:
                raise as_failure(exc) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlexMFError as exc:
            raise as_failure(exc) from None

    return wrapper


def flexmf_asset(**kwargs):
    """``@dg.asset(**kwargs)`` over :func:`user_errors`: the project's assets fail a step on a
    :class:`FlexMFError` with its one-line message."""
    return lambda fn: dg.asset(**kwargs)(user_errors(fn))
