"""A federation's certificates: made with `cryptography`, checked before use, refused with a reason."""

from __future__ import annotations

import datetime
import stat

import pytest

from fedrdma.control.certs import CA_KEY_FILE, init_ca, issue
from fedrdma.transport.tls import CA_FILE, CLIENT, SERVER, CredentialError, Credentials, kind_of


@pytest.fixture
def fed(tmp_path):
    init_ca(tmp_path)
    issue(tmp_path, "aggregator", SERVER, hosts=["agg.example.org", "198.19.1.1"])
    issue(tmp_path, "hospital", CLIENT)
    return tmp_path


def test_keys_are_owner_only_and_certificates_check_out_for_their_role(fed):
    for name in (CA_KEY_FILE, "aggregator.key", "hospital.key"):
        assert stat.S_IMODE((fed / name).stat().st_mode) == 0o600, name
    Credentials.load(fed, "aggregator").check(SERVER)
    hospital = Credentials.load(fed, "hospital")
    hospital.check(CLIENT)
    cert = hospital.certificate()
    assert kind_of(cert) == CLIENT and cert.subject.rfc4514_string() == "CN=hospital"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > datetime.timedelta(days=300), "it expires, in a year"


def test_the_aggregators_certificate_names_the_hosts_silos_dial(fed):
    from cryptography import x509

    san = Credentials.load(fed, "aggregator").certificate().extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["agg.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["198.19.1.1"]


def test_a_certificate_of_another_role_is_refused_with_the_role_named(fed):
    with pytest.raises(CredentialError, match="is a silo certificate, not an aggregator certificate"):
        Credentials.load(fed, "hospital").check(SERVER)
    with pytest.raises(CredentialError, match="is an aggregator certificate, not a silo certificate"):
        Credentials.load(fed, "aggregator").check(CLIENT)


def test_an_expired_certificate_is_refused_with_its_date_and_the_fix(fed):
    issue(fed, "bank", CLIENT, days=1, now=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3))
    with pytest.raises(CredentialError, match=r"bank.pem expired on .*--role silo --force"):
        Credentials.load(fed, "bank").check(CLIENT)


def test_a_certificate_of_another_federation_is_refused(fed, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    init_ca(other)
    issue(other, "hospital", CLIENT)
    (other / CA_FILE).write_bytes((fed / CA_FILE).read_bytes())  # this federation's CA beside the other's cert
    with pytest.raises(CredentialError, match="was not issued by the CA in .*another federation"):
        Credentials.load(other, "hospital").check(CLIENT)


def test_a_key_that_is_not_the_certificates_is_refused(fed):
    (fed / "hospital.key").write_bytes((fed / "aggregator.key").read_bytes())
    with pytest.raises(CredentialError, match="hospital.key is not the key of"):
        Credentials.load(fed, "hospital").check(CLIENT)


def test_nothing_is_replaced_without_force_and_a_missing_file_names_the_fix(fed):
    before = (fed / "hospital.pem").read_bytes()
    with pytest.raises(CredentialError, match="exist.*--force"):
        issue(fed, "hospital", CLIENT)
    assert (fed / "hospital.pem").read_bytes() == before
    issue(fed, "hospital", CLIENT, force=True)
    assert (fed / "hospital.pem").read_bytes() != before, "rotation replaces the pair"
    with pytest.raises(CredentialError, match="clinic.pem.*missing.*fedrdma certs issue DIR clinic"):
        Credentials.load(fed, "clinic")


@pytest.mark.parametrize("name,kind,hosts,reason", [
    ("bad name!", CLIENT, (), "cannot name a certificate"),
    ("hospital2", CLIENT, ("x.org",), "--host names the aggregator"),
    ("x", "auditor", (), "not 'auditor'"),
])
def test_bad_requests_are_refused_before_anything_is_written(fed, name, kind, hosts, reason):
    with pytest.raises(CredentialError, match=reason):
        issue(fed, name, kind, hosts=hosts)
    assert not (fed / f"{name}.key").exists()
