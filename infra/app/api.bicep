// The Function App on a Flex Consumption (FC1, Linux) plan, Python 3.11, deployed from a blob container
// it reads with the user-assigned identity.
param name string
param planName string
param location string
param tags object = {}
@description('Must match the service name in azure.yaml, so `azd deploy` finds this app.')
param serviceName string = 'api'
param storageAccountName string
param deploymentContainerName string
param identityId string
param identityClientId string
param appInsightsName string
param tableEndpoint string
param tableName string
@description('BACKEND_{i}_* settings built in main.bicep.')
param backendSettings object
@secure()
param clientKey string
@description('App (client) or object ids whose Entra ID tokens are accepted besides the key; empty: none.')
param entraAllowedClients string = ''
@description('Client names that may read /lb/status and every client\'s /lb/usage; empty: none.')
param adminClients string = ''
param pythonVersion string = '3.11'
param maximumInstanceCount int = 100
param instanceMemoryMB int = 2048
@description('HTTP requests one instance takes at once; Flex gives Python apps 1 unless set.')
param perInstanceConcurrency int
@description('Instances of the HTTP group kept running even when idle (billed while idle); 0 = scale to zero.')
param alwaysReadyInstances int = 0

// Tokens of this tenant from the listed identities (e.g. the chat app's managed identity) are accepted.
// <app-settings>
var entraSettings = empty(entraAllowedClients) ? {} : {
  LB_ENTRA_TENANT_ID: tenant().tenantId
  LB_ENTRA_ALLOWED_CLIENTS: entraAllowedClients
}
var adminSettings = empty(adminClients) ? {} : {
  LB_ADMIN_CLIENTS: adminClients
}
// </app-settings>

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2026-03-15' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true // Linux
  }
}

resource app 'Microsoft.Web/sites@2026-03-15' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': serviceName })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identityId}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
    }
    // Flex takes runtime and package location here, not from app settings
    // (FUNCTIONS_WORKER_RUNTIME, WEBSITE_RUN_FROM_PACKAGE & co. are rejected).
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        // All HTTP functions scale as one group, named `http`.
        alwaysReady: alwaysReadyInstances > 0 ? [{ name: 'http', instanceCount: alwaysReadyInstances }] : []
        triggers: {
          http: {
            perInstanceConcurrency: perInstanceConcurrency
          }
        }
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }

  resource settings 'config' = {
    name: 'appsettings'
    // <app-settings>
    properties: union(backendSettings, entraSettings, adminSettings, {
      // Host storage through the identity (the account has shared keys off).
      AzureWebJobsStorage__accountName: storage.name
      AzureWebJobsStorage__credential: 'managedidentity'
      AzureWebJobsStorage__clientId: identityClientId
      // Telemetry with an Entra token, since App Insights local auth is off.
      APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
      APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
      // DefaultAzureCredential picks this identity for the backends and the table.
      AZURE_CLIENT_ID: identityClientId
      // The HTTP streaming extension needs init-time indexing.
      PYTHON_ENABLE_INIT_INDEXING: '1'
      LB_STATE_TABLE_ENDPOINT: tableEndpoint
      LB_STATE_TABLE: tableName
      LB_CLIENT_KEYS: clientKey
    })
    // </app-settings>
  }
}

output name string = app.name
output uri string = 'https://${app.properties.defaultHostName}'
