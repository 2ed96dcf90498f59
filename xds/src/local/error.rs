//! What can be wrong with a mesh file, said so that the reader can find and
//! fix it: the file, the field path (`workloads[1].addresses[0]`), the line
//! and column when the parser knows them, and the problem.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use serde_saphyr::MessageFormatter;

/// Why a mesh file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read mesh file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Invalid(Box<Invalid>),
}

impl LoadError {
    /// The details when the text was read but is not a valid mesh.
    pub fn invalid(&self) -> Option<&Invalid> {
        match self {
            LoadError::Invalid(invalid) => Some(invalid),
            LoadError::Read { .. } => None,
        }
    }
}

impl From<Box<Invalid>> for LoadError {
    fn from(invalid: Box<Invalid>) -> Self {
        LoadError::Invalid(invalid)
    }
}

/// A mesh file's text that is not a valid mesh.
#[derive(Debug, thiserror::Error)]
pub struct Invalid {
    /// The file, when the text came from one.
    pub file: Option<PathBuf>,
    /// Path of the offending field from the document root, e.g.
    /// `workloads[1].addresses[0]`; empty for the document as a whole.
    pub field: String,
    pub position: Option<Position>,
    pub problem: Problem,
}

impl Invalid {
    pub(super) fn new(
        field: impl Into<String>,
        position: Option<Position>,
        problem: Problem,
    ) -> Box<Self> {
        Box::new(Self {
            file: None,
            field: field.into(),
            position,
            problem,
        })
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `file:line:column:` as compilers print it, so editors can jump there.
        match (&self.file, self.position) {
            (Some(file), Some(p)) => write!(f, "{}:{}:{}", file.display(), p.line, p.column)?,
            (Some(file), None) => write!(f, "{}", file.display())?,
            (None, Some(p)) => write!(f, "mesh file line {}, column {}", p.line, p.column)?,
            (None, None) => f.write_str("mesh file")?,
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// A line and column in the mesh file, both from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

impl Position {
    pub(super) fn of(location: serde_saphyr::Location) -> Option<Self> {
        // The parser marks "unknown" with line 0.
        (location.line() != 0).then(|| Position {
            line: location.line(),
            column: location.column(),
        })
    }
}

/// What is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// Not YAML, or not the mesh file's shape or values, in the parser's words.
    #[error("{0}")]
    Yaml(String),
    #[error("workload uid {uid:?} is already used by {first}")]
    DuplicateUid { uid: String, first: String },
    #[error(
        "address {ip} (network {network:?}) of workload {uid:?} is already used by workload \
         {other:?} at {other_field}"
    )]
    DuplicateAddress {
        network: String,
        ip: IpAddr,
        uid: String,
        other: String,
        other_field: String,
    },
    #[error(
        "address {ip} (network {network:?}) of workload {uid:?} is a VIP of service \
         {service:?} at {service_field}"
    )]
    AddressIsVip {
        network: String,
        ip: IpAddr,
        uid: String,
        service: String,
        service_field: String,
    },
    #[error("service {key:?} is already defined by {first}")]
    DuplicateService { key: String, first: String },
    #[error(
        "VIP {ip} (network {network:?}) of service {service:?} is already used by service \
         {other:?} at {other_field}"
    )]
    DuplicateVip {
        network: String,
        ip: IpAddr,
        service: String,
        other: String,
        other_field: String,
    },
    #[error("service port {port} is listed twice, first at {first}")]
    DuplicatePort { port: u16, first: String },
    #[error("service {key:?} is not defined in the file's services")]
    UnknownService { key: String },
    #[error("identity is invalid: {0}")]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Policy(#[from] crate::policy::Problem),
    #[error("authorization policy {key:?} is already defined by {first}")]
    DuplicatePolicy { key: String, first: String },
    #[error(
        "a match with no fields never matches (Istio skips it); remove it, or remove the \
         clause to match every connection"
    )]
    EmptyMatch,
    #[error("authorization policy {key:?} is not defined in the file's policies")]
    UnknownPolicy { key: String },
    #[error(
        "authorization policy {key:?} at {at} has scope {scope}; only WORKLOAD_SELECTOR \
         policies are attached through authorizationPolicies"
    )]
    NotSelectorPolicy {
        key: String,
        scope: crate::policy::Scope,
        at: String,
    },
}

/// Turns the parser's error into ours, with the field path serde reached.
pub(super) fn from_parser(
    error: &serde_saphyr::Error,
    path: Option<&serde_path_to_error::Path>,
) -> Box<Invalid> {
    let error = error.without_snippet();
    let message = match error {
        serde_saphyr::Error::MultipleDocuments { .. } => {
            "the mesh file must hold a single YAML document".into()
        }
        // Its own text, without the snippet and the location suffix we
        // print ourselves.
        other => printable(&serde_saphyr::UserMessageFormatter.format_message(other)),
    };
    let field = path.map(field_of).unwrap_or_default();
    Invalid::new(
        field,
        error.location().and_then(Position::of),
        Problem::Yaml(message),
    )
}

/// `workloads[1].services["demo/echo.demo.svc.cluster.local"].ports[0]`
fn field_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut field = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            // `Spanned` reads its value through a field of that name; the
            // mesh file has no field called `value`.
            Segment::Map { key } if key == "value" => {}
            Segment::Map { key } => field.push_str(&key_segment(&field, key)),
            Segment::Enum { variant } => field.push_str(&key_segment(&field, variant)),
            Segment::Unknown => {}
        }
    }
    field
}

/// One path step for a map key: `.name` for plain field names, `["k"]` for
/// anything else (service keys hold `/` and `.`).
pub(super) fn key_segment(parent: &str, key: &str) -> String {
    let plain = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    match (plain, parent.is_empty()) {
        (true, true) => key.to_owned(),
        (true, false) => format!(".{key}"),
        (false, _) => format!("[{key:?}]"),
    }
}

/// Keeps user-supplied text from writing control characters to a terminal.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
