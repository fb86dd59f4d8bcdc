//! Who is calling: the role and name carried by a peer's client certificate.
//!
//! **Invariant:** authorisation decisions are taken from the certificate the
//! TLS layer verified against the Outpost CA, never from anything the peer
//! says in a message.

use tonic::{Request, Status};

/// The role a certificate was issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Admin,
    Server,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::Server => "server",
        }
    }
}

/// A verified peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    /// Reads the `urn:outpost:<role>:<name>` SAN of a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|gn| match gn {
            x509_parser::extensions::GeneralName::URI(uri) => parse_uri(uri),
            _ => None,
        })
    }

    /// The identity of the caller of a gRPC request, if it is of `role`.
    pub fn require<T>(request: &Request<T>, role: Role) -> Result<Identity, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let first = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let id = Identity::from_der(first.as_ref()).ok_or_else(|| {
            Status::permission_denied("the client certificate carries no Outpost role")
        })?;
        if id.role != role {
            return Err(Status::permission_denied(format!(
                "a {} certificate may not call the {} API",
                id.role.as_str(),
                role.as_str()
            )));
        }
        Ok(id)
    }
}

fn parse_uri(uri: &str) -> Option<Identity> {
    let rest = uri.strip_prefix("urn:outpost:")?;
    let (role, name) = rest.split_once(':')?;
    let role = match role {
        "agent" => Role::Agent,
        "admin" => Role::Admin,
        "server" => Role::Server,
        _ => return None,
    };
    if name.is_empty() {
        return None;
    }
    Some(Identity {
        role,
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_role_uris() {
        assert_eq!(
            parse_uri("urn:outpost:agent:a-1"),
            Some(Identity {
                role: Role::Agent,
                name: "a-1".into()
            })
        );
        assert_eq!(parse_uri("urn:outpost:root:x"), None);
        assert_eq!(parse_uri("urn:outpost:admin:"), None);
        assert_eq!(parse_uri("spiffe://x/admin"), None);
    }
}
