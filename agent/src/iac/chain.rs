//! Two sets of hooks around one container, called in order (the run's own
//! hooks, then the AWS credentials channel of a stack with a role).

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::executor::hooks::{HookContext, HookError, JobHooks};
use crate::job::Outcome;

pub struct Chain<'a> {
    pub first: &'a dyn JobHooks,
    pub second: &'a dyn JobHooks,
}

impl JobHooks for Chain<'_> {
    fn configure<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
        body: &'a mut bollard::models::ContainerCreateBody,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        async move {
            self.first.configure(ctx, body).await?;
            self.second.configure(ctx, body).await
        }
        .boxed()
    }

    fn before_start<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        async move {
            self.first.before_start(ctx).await?;
            self.second.before_start(ctx).await
        }
        .boxed()
    }

    fn after_start<'a>(&'a self, ctx: &'a HookContext<'a>) -> BoxFuture<'a, Result<(), HookError>> {
        async move {
            self.first.after_start(ctx).await?;
            self.second.after_start(ctx).await
        }
        .boxed()
    }

    /// Both run whatever the first returned; the first error wins.
    fn adopted<'a>(&'a self, ctx: &'a HookContext<'a>) -> BoxFuture<'a, Result<(), HookError>> {
        async move {
            let a = self.first.adopted(ctx).await;
            let b = self.second.adopted(ctx).await;
            a.and(b)
        }
        .boxed()
    }

    /// Both run whatever the first returned; the first error wins.
    fn after_exit<'a>(
        &'a self,
        ctx: &'a HookContext<'a>,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, Result<(), HookError>> {
        async move {
            let a = self.first.after_exit(ctx, outcome).await;
            let b = self.second.after_exit(ctx, outcome).await;
            a.and(b)
        }
        .boxed()
    }
}
