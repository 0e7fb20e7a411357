"""Which environment variables each MNEMOS process is given by whoever starts it.

``mnemos up`` starts every role as a child process, and the autoscaler's ``local``
provider starts workers; both hand a child only its own settings (one rule, here).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["child_env", "passthrough_names", "role_creds_variable", "CREDS_VARIABLE"]

#: Settings every role reads: where NATS is, the namespace, replicas, logging.
_SHARED_SETTINGS = ("MNEMOS_NATS_", "MNEMOS_NAMESPACE", "MNEMOS_REPLICAS", "MNEMOS_LOG_")
#: The settings (and credentials) of each role; no role is given another's.
_ROLE_SETTINGS: dict[str, tuple[str, ...]] = {
    "control-plane": ("MNEMOS_CP_",),
    # Workers download S3-stored models, so they get the artifact store's settings.
    "worker": ("MNEMOS_WORKER_", "MNEMOS_ARTIFACT_STORE", "MNEMOS_S3_", "MNEMOS_UPLOAD_CHUNK_BYTES", "AWS_"),
    "gateway": ("MNEMOS_GATEWAY_",),
    # The autoscaler starts workers (the local provider) with the worker's settings; the
    # AWS credentials are its own (the aws provider) and the workers' (S3 models).
    "autoscaler": ("MNEMOS_AUTOSCALER_", "MNEMOS_WORKER_", "MNEMOS_ARTIFACT_STORE", "MNEMOS_S3_",
                   "MNEMOS_UPLOAD_CHUNK_BYTES", "MNEMOS_UP_PASS_ENV", "AWS_"),
}
#: What any process needs to run (paths, locale, Python, the ML libraries' caches and
#: devices); nothing else of the caller's environment (tokens, keys) reaches a child.
_PROCESS_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_", "TZ", "TERM", "TMPDIR", "XDG_", "PYTHON",
    "VIRTUAL_ENV", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "CUDA_", "NVIDIA_", "LD_LIBRARY_PATH", "HF_",
    "TRANSFORMERS_", "TORCH", "OMP_", "MKL_", "TOKENIZERS_", "VLLM_",
)


def child_env(role: str, environ: Mapping[str, str], passthrough: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment ``mnemos up`` gives a child of ``role``: the process basics, the
    shared settings and that role's own settings, plus the variables named in
    ``passthrough`` (``MNEMOS_UP_PASS_ENV``, for workers and the autoscaler that starts
    them). A worker runs user code, so it must never see the gateway's API keys or anything else it does not need.

    Credentials: a role's own file (``MNEMOS_WORKER_NATS_CREDS`` for a worker, and so on)
    becomes its ``MNEMOS_NATS_CREDS``; without one it keeps the caller's."""
    allowed = _PROCESS_ENV + _SHARED_SETTINGS + _ROLE_SETTINGS[role]
    env = {
        k: v for k, v in environ.items()
        if k.startswith(allowed) or (role in ("worker", "autoscaler") and k in passthrough)
    }
    own = environ.get(role_creds_variable(role))
    if own:
        env[CREDS_VARIABLE] = own
    return env


#: The variable every role reads its NATS credentials file from.
CREDS_VARIABLE = "MNEMOS_NATS_CREDS"


def role_creds_variable(role: str) -> str:
    """Where whoever starts a ``role`` process finds the credentials to give it
    (``MNEMOS_WORKER_NATS_CREDS``): inside the role's own settings prefix."""
    return _ROLE_SETTINGS[role][0] + "NATS_CREDS"


def passthrough_names(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The extra variables ``MNEMOS_UP_PASS_ENV`` (comma-separated names) lets reach workers."""
    return tuple(v.strip() for v in environ.get("MNEMOS_UP_PASS_ENV", "").split(",") if v.strip())
