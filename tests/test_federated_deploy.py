"""A federation as deployed: the sites reach the coordinator over TLS (Flower's certificate options), and afterwards
the coordinator's folder exports a bundle while each site chooses and learns postprocessing on its own held-out
cases with ``find-best`` (the coordinator has no labels)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import threading

import pytest

pytest.importorskip("flwr")

from autoseg.cli import main  # noqa: E402
from autoseg.data.synthetic import make_synthetic_dataset  # noqa: E402
from autoseg.federated.client import run_site  # noqa: E402
from autoseg.federated.planning import plan_federation  # noqa: E402
from autoseg.federated.server import FederationSettings, run_server  # noqa: E402
from autoseg.federated.simulate import free_port, simulate  # noqa: E402
from autoseg.federated.site import Site  # noqa: E402
from autoseg.federated.strategy import HISTORY  # noqa: E402
from autoseg.fingerprint.merge import site_statistics  # noqa: E402
from autoseg.io.dataset import load_dataset  # noqa: E402
from autoseg.training.settings import TrainSettings  # noqa: E402

TRAIN = TrainSettings(progress=False, val_iters=1, workers=0, device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _site(tmp_path, k=0):
    root = make_synthetic_dataset(tmp_path / f"site{k}" / "Dataset008_Fed", n_cases=5, shape=(20, 20, 20),
                                  n_channels=2, regions=True, seed=10 + k)
    return Site(load_dataset(root), tmp_path / f"work{k}", fold=0, settings=TRAIN)


def _coordinator(tmp_path, sites):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("autoseg_tests_conftest", Path(__file__).parent / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    _, plans = plan_federation([site_statistics(s.dataset, progress=False) for s in sites], dataset_name="Fed",
                               preset="cpu")
    wd = tmp_path / "server"
    wd.mkdir()
    conftest.tiny_plans(plans).save(wd / "plans.json")  # a coordinator with plans.json uses them (tiny network)
    return wd


def _certificates():
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it: (CA PEM, certificate PEM, key PEM)."""
    x509 = pytest.importorskip("cryptography.x509", reason="the `cryptography` package makes the test certificates")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = cert(ca_name, ca_key, ca_name, ca_key, True)
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key, ca_name, ca_key, False)
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), server.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def test_a_site_trains_through_tls_with_flowers_certificates(tmp_path):
    ca, certificate, key = _certificates()
    site = _site(tmp_path)
    wd = _coordinator(tmp_path, [site])
    address = f"127.0.0.1:{free_port()}"
    settings = FederationSettings(rounds=1, min_sites=1, iters_per_epoch=1, wait_timeout=60, round_timeout=60)
    result, errors = {}, []

    def serve():
        try:
            result["r"] = run_server(wd, settings, address=address, certificates=(ca, certificate, key),
                                     log=lambda s: None)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    run_site(site, "siteA", address, root_certificates=ca, max_wait_time=30, log=lambda s: None)
    server.join(60)
    assert not errors and not server.is_alive() and result["r"].rounds_done == 1
    history = json.loads((wd / HISTORY).read_text())["history"]
    assert [h["sites"] for h in history if h["kind"] == "fit"] == [["siteA"]]


def test_the_coordinator_exports_a_bundle_and_a_site_runs_find_best_on_its_held_out_cases(tmp_path):
    site = _site(tmp_path)
    wd = _coordinator(tmp_path, [site])
    simulate([site.dataset.root], wd, FederationSettings(rounds=1, min_sites=1, iters_per_epoch=1), train=TRAIN,
             fold=0, log=lambda s: None)
    bundle = tmp_path / "bundle"
    assert main(["-q", "export", "--workdir", str(wd), "-o", str(bundle)]) == 0
    assert main(["-q", "verify-bundle", str(bundle)]) == 0
    # the site's folder holds the validated global model as its fold and knows its dataset: find-best chooses it and
    # learns postprocessing there; predict then uses that choice
    at_site = wd / "sites" / "site0"
    assert main(["-q", "find-best", "--workdir", str(at_site)]) == 0
    best = json.loads((at_site / "selection" / "best.json").read_text())
    assert "3d_fullres" in json.dumps(best)
    out = tmp_path / "pred"
    case = site.dataset.cases[0]
    assert main(["-q", "predict", "-i", *map(str, case.images), "-o", str(out), "--workdir", str(at_site)]) == 0
    assert any(out.iterdir())
