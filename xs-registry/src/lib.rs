//! The xenstore side of ddstor: the registry schema under `/local/domain/<D>/data/ddstor/`,
//! lookup/list/watch for dom0, and a spec-faithful test xenstored for machines without Xen.
