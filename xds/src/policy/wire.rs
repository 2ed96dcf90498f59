//! Conversions from the loosely typed fields of `istio.security` messages (enum numbers,
//! `u32` ports, raw address bytes) and of the mesh file (CIDR text) into the model's types.
//! Each refuses what it cannot represent exactly, with the [`Problem`] to report: truncating
//! a port or dropping a bad address would change what a policy matches.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Action, Problem, Scope};

/// `istio.security.Scope`.
pub fn scope(value: i32) -> Result<Scope, Problem> {
    match value {
        0 => Ok(Scope::Global),
        1 => Ok(Scope::Namespace),
        2 => Ok(Scope::WorkloadSelector),
        other => Err(Problem::UnknownScope(other)),
    }
}

/// `istio.security.Action`.
pub fn action(value: i32) -> Result<Action, Problem> {
    match value {
        0 => Ok(Action::Allow),
        1 => Ok(Action::Deny),
        other => Err(Problem::UnknownAction(other)),
    }
}

/// A destination port, 1 to 65535.
pub fn port(value: u32) -> Result<u16, Problem> {
    match u16::try_from(value) {
        Ok(0) => Err(Problem::PortZero),
        Ok(p) => Ok(p),
        Err(_) => Err(Problem::PortOutOfRange(value)),
    }
}

/// `istio.security.Address`: 4 or 16 address bytes and a prefix length.
pub fn cidr(address: &[u8], length: u32) -> Result<IpNet, Problem> {
    let ip = match address.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(address).expect("length checked")),
        16 => IpAddr::from(<[u8; 16]>::try_from(address).expect("length checked")),
        n => return Err(Problem::AddressLength(n)),
    };
    net(ip, length)
}

/// `198.18.0.0/15`, `2001:2::/48`, or a bare address (a host: /32 or /128). Host bits under
/// the prefix are allowed and ignored, as Istio does.
pub fn parse_cidr(text: &str) -> Result<IpNet, Problem> {
    let bad = || Problem::Cidr(text.to_owned());
    match text.split_once('/') {
        None => text.parse::<IpAddr>().map(IpNet::from).map_err(|_| bad()),
        Some((ip, len)) => {
            let ip: IpAddr = ip.parse().map_err(|_| bad())?;
            // Digits only: `u32::from_str` would accept "+24".
            if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let length = len.parse().unwrap_or(u32::MAX);
            net(ip, length)
        }
    }
}

fn net(address: IpAddr, length: u32) -> Result<IpNet, Problem> {
    let max = if address.is_ipv4() { 32 } else { 128 };
    u8::try_from(length)
        .ok()
        .and_then(|l| IpNet::new(address, l).ok())
        .ok_or(Problem::PrefixLength {
            address,
            length,
            max,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_and_ports_refuse_what_they_cannot_represent() {
        assert_eq!(scope(2), Ok(Scope::WorkloadSelector));
        assert_eq!(scope(3), Err(Problem::UnknownScope(3)));
        assert_eq!(action(1), Ok(Action::Deny));
        assert_eq!(action(-1), Err(Problem::UnknownAction(-1)));
        assert_eq!(port(65535), Ok(65535));
        assert_eq!(port(0), Err(Problem::PortZero));
        // Truncating would turn 65616 into 80.
        assert_eq!(port(65616), Err(Problem::PortOutOfRange(65616)));
    }

    #[test]
    fn addresses_need_4_or_16_bytes_and_a_fitting_prefix() {
        assert_eq!(
            cidr(&[198, 18, 0, 0], 15),
            Ok("198.18.0.0/15".parse().unwrap())
        );
        let v6: [u8; 16] = "2001:2::".parse::<std::net::Ipv6Addr>().unwrap().octets();
        assert_eq!(cidr(&v6, 48), Ok("2001:2::/48".parse().unwrap()));
        assert_eq!(cidr(&[1, 2, 3], 8), Err(Problem::AddressLength(3)));
        assert!(matches!(
            cidr(&[198, 18, 0, 0], 33),
            Err(Problem::PrefixLength { max: 32, .. })
        ));
        assert!(matches!(
            cidr(&v6, 129),
            Err(Problem::PrefixLength { max: 128, .. })
        ));
        assert!(matches!(
            cidr(&[198, 18, 0, 0], 300),
            Err(Problem::PrefixLength { length: 300, .. })
        ));
    }

    #[test]
    fn cidr_text_parses_hosts_and_prefixes_and_names_bad_input() {
        assert_eq!(
            parse_cidr("198.18.0.1"),
            Ok("198.18.0.1/32".parse().unwrap())
        );
        assert_eq!(
            parse_cidr("2001:2::1"),
            Ok("2001:2::1/128".parse().unwrap())
        );
        assert_eq!(
            parse_cidr("198.18.0.0/15"),
            Ok("198.18.0.0/15".parse().unwrap())
        );
        for bad in [
            "",
            "198.18.0.0/",
            "198.18.0.0/+8",
            "198.18.0/15",
            "x/8",
            "::/a",
        ] {
            assert_eq!(parse_cidr(bad), Err(Problem::Cidr(bad.into())), "{bad:?}");
        }
        assert!(matches!(
            parse_cidr("198.18.0.0/33"),
            Err(Problem::PrefixLength { length: 33, .. })
        ));
        assert!(matches!(
            parse_cidr("2001:2::/129"),
            Err(Problem::PrefixLength { max: 128, .. })
        ));
    }
}
